"""Subject lists and categories of the multiple-choice benchmarks, as the official Qwen `eval/` scripts
group them (evaluate_mmlu.py, evaluate_ceval.py, evaluate_cmmlu.py)."""

MMLU_CATEGORIES = {
    "stem": ["abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
             "college_computer_science", "college_mathematics", "college_physics", "computer_security",
             "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
             "high_school_chemistry", "high_school_computer_science", "high_school_mathematics",
             "high_school_physics", "high_school_statistics", "machine_learning"],
    "Humanities": ["formal_logic", "high_school_european_history", "high_school_us_history",
                   "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
                   "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
                   "world_religions"],
    "other": ["business_ethics", "college_medicine", "human_aging", "management", "marketing", "medical_genetics",
              "miscellaneous", "nutrition", "professional_accounting", "professional_medicine", "virology",
              "global_facts", "clinical_knowledge"],
    "social": ["econometrics", "high_school_geography", "high_school_government_and_politics",
               "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
               "human_sexuality", "professional_psychology", "public_relations", "security_studies", "sociology",
               "us_foreign_policy"],
}

CEVAL_CATEGORIES = {
    "STEM": ["computer_network", "operating_system", "computer_architecture", "college_programming",
             "college_physics", "college_chemistry", "advanced_mathematics", "probability_and_statistics",
             "discrete_mathematics", "electrical_engineer", "metrology_engineer", "high_school_mathematics",
             "high_school_physics", "high_school_chemistry", "high_school_biology", "middle_school_mathematics",
             "middle_school_biology", "middle_school_physics", "middle_school_chemistry", "veterinary_medicine"],
    "Social Science": ["college_economics", "business_administration", "marxism", "mao_zedong_thought",
                       "education_science", "teacher_qualification", "high_school_politics",
                       "high_school_geography", "middle_school_politics", "middle_school_geography"],
    "Humanities": ["modern_chinese_history", "ideological_and_moral_cultivation", "logic", "law",
                   "chinese_language_and_literature", "art_studies", "professional_tour_guide",
                   "legal_professional", "high_school_chinese", "high_school_history", "middle_school_history"],
    "Other": ["civil_servant", "sports_science", "plant_protection", "basic_medicine", "clinical_medicine",
              "urban_and_rural_planner", "accountant", "fire_engineer", "environmental_impact_assessment_engineer",
              "tax_accountant", "physician"],
}
# C-Eval's "Hard" figure averages these subjects.
CEVAL_HARD = ["advanced_mathematics", "discrete_mathematics", "probability_and_statistics", "college_physics",
              "college_chemistry", "high_school_mathematics", "high_school_physics", "high_school_chemistry"]

# CMMLU: subject -> subcategories, subcategory -> category; a subject may count in two categories
# ("China specific" overlaps the others).
_CMMLU_SUBCATEGORIES = {
    "agronomy": ["other"], "anatomy": ["biology"], "ancient_chinese": ["linguistics", "china specific"],
    "arts": ["arts"], "astronomy": ["physics"], "business_ethics": ["business"],
    "chinese_civil_service_exam": ["politics", "china specific"], "chinese_driving_rule": ["other", "china specific"],
    "chinese_food_culture": ["culture", "china specific"], "chinese_foreign_policy": ["politics", "china specific"],
    "chinese_history": ["history", "china specific"], "chinese_literature": ["literature", "china specific"],
    "chinese_teacher_qualification": ["education", "china specific"], "college_actuarial_science": ["math"],
    "college_education": ["education"], "college_engineering_hydrology": ["engineering"], "college_law": ["law"],
    "college_mathematics": ["math"], "college_medical_statistics": ["statistics"], "clinical_knowledge": ["other"],
    "college_medicine": ["other"], "computer_science": ["computer science"], "computer_security": ["other"],
    "conceptual_physics": ["physics"], "construction_project_management": ["other", "china specific"],
    "economics": ["economics"], "education": ["education"], "elementary_chinese": ["linguistics", "china specific"],
    "elementary_commonsense": ["other", "china specific"], "elementary_information_and_technology": ["other"],
    "electrical_engineering": ["engineering"], "elementary_mathematics": ["math"],
    "ethnology": ["culture", "china specific"], "food_science": ["other"], "genetics": ["biology"],
    "global_facts": ["global"], "high_school_biology": ["biology"], "high_school_chemistry": ["chemistry"],
    "high_school_geography": ["geography"], "high_school_mathematics": ["math"], "high_school_physics": ["physics"],
    "high_school_politics": ["politics", "china specific"], "human_sexuality": ["other"],
    "international_law": ["law"], "journalism": ["sociology"], "jurisprudence": ["law"],
    "legal_and_moral_basis": ["other"], "logical": ["philosophy"], "machine_learning": ["computer science"],
    "management": ["business"], "marketing": ["business"], "marxist_theory": ["philosophy"],
    "modern_chinese": ["linguistics", "china specific"], "nutrition": ["other"], "philosophy": ["philosophy"],
    "professional_accounting": ["business"], "professional_law": ["law"], "professional_medicine": ["other"],
    "professional_psychology": ["psychology"], "public_relations": ["politics"], "security_study": ["politics"],
    "sociology": ["culture"], "sports_science": ["other"], "traditional_chinese_medicine": ["other", "china specific"],
    "virology": ["biology"], "world_history": ["history"], "world_religions": ["global"],
}
_CMMLU_GROUPS = {
    "STEM": ["physics", "chemistry", "biology", "computer science", "math", "engineering", "statistics"],
    "Humanities": ["history", "philosophy", "law", "arts", "literature", "global"],
    "Social Science": ["linguistics", "business", "politics", "culture", "economics", "geography", "psychology",
                       "education", "sociology"],
    "Other": ["other"],
    "China specific": ["china specific"],
}
CMMLU_CATEGORIES = {cat: [s for s, subs in _CMMLU_SUBCATEGORIES.items() if any(c in subs for c in groups)]
                    for cat, groups in _CMMLU_GROUPS.items()}

SUBJECTS = {
    "mmlu": [s for subs in MMLU_CATEGORIES.values() for s in subs],
    "ceval": [s for subs in CEVAL_CATEGORIES.values() for s in subs],
    "cmmlu": list(_CMMLU_SUBCATEGORIES),
}
CATEGORIES = {"mmlu": MMLU_CATEGORIES, "ceval": CEVAL_CATEGORIES, "cmmlu": CMMLU_CATEGORIES}


def categories_of(benchmark: str, subject: str) -> list[str]:
    """The categories a subject counts in (empty for a subject the official lists do not name)."""
    return [cat for cat, subs in CATEGORIES[benchmark].items() if subject in subs]
